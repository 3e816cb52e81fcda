"""SAEs themselves: the checks every loaded SAE passes (check.py), the plain safetensors file (file.py), training
with sae_lens (train.py), checkpoints and [train_sae] recipes."""
