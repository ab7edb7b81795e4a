"""lora-scaffold: generate a PEFT LoRA layer, and its tests, for a torch module class PEFT cannot adapt yet."""

__version__ = "0.1.0"
