"""What the trainer optimises (tasks), the config's rules and its memory in a run directory, the
train state and optimiser, the compiled steps, the trainer loop, run control (signals, the lock) and
reading runs back."""
