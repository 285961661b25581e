"""loracli: train LoRA/LyCORIS adapters for Stable Diffusion the sd-scripts way."""

__version__ = "0.1.0"
