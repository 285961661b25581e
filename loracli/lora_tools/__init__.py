"""After training: `loracli resize`, `loracli merge` and `loracli extract`.

The run side of the three commands (torch, safetensors, lycoris); the CLI imports
it lazily so `loracli --help` stays torch-free. Every command streams: a LoRA
module or a checkpoint tensor at a time, never a whole checkpoint twice.
"""
