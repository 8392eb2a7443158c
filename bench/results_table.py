"""Markdown rows from finished runs: python bench/results_table.py runs/*/results.json"""
import json
import os
import sys


def row(path):
    r = json.load(open(path))
    cfg, test, pop = r["config"], r["test"], r["popularity_test"]
    data = "synthetic" if cfg["data"] == "synthetic" else os.path.splitext(os.path.basename(cfg["data"]))[0]
    loss = cfg.get("loss") or ("infonce" if cfg["use_infonce"] else "bce")
    if (cfg.get("similarity") or ("cosine" if loss == "infonce" else "dot")) == "cosine":
        loss += f" (T={cfg.get('temperature', cfg.get('infonce_temperature')):g})"
    sampled = (f"{test['sampled_HR@10']:.4f} / {test['sampled_NDCG@10']:.4f}" if "sampled_HR@10" in test else "")
    return (f"| {data} | {loss} | {cfg['hidden_units']} | {test['HR@10']:.4f} | {test['NDCG@10']:.4f} | "
            f"{pop['HR@10']:.4f} | {pop['NDCG@10']:.4f} | {sampled} | {r.get('best_epoch', '')} | "
            f"{r.get('train_minutes', 0):.1f} |")


if __name__ == "__main__":
    print("| data | loss | d | HR@10 | NDCG@10 | pop HR@10 | pop NDCG@10 | sampled HR@10 / NDCG@10 | best epoch | "
          "train min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in sys.argv[1:]:
        print(row(p))
