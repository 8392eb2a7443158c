"""What training optimises: the losses, their negative samplers and queue, the auxiliary contrastive losses."""
