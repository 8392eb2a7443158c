"""Reading data into dataset.Interactions: competition folders (taac.py), item side information, safe pickles."""
