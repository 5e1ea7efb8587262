"""The networks (the official ScoreUNet, a noise-conditional classifier, a VAE) and the VDM module
that joins a schedule and a network into the bound."""
