"""nanoalign: minimal post-training of vision-language models in plain PyTorch."""
