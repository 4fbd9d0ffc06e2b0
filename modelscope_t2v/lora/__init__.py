"""LoRAs: files in three formats read into one neutral form (formats.py, names.py) and applied to the networks'
weights for inference (apply.py)."""

from .formats import (LoraPair, LoraWeights, read_lora, write_cloneofsimo_lora, write_peft_lora,
                      write_stable_lora)

__all__ = ['LoraPair', 'LoraWeights', 'read_lora', 'write_stable_lora', 'write_peft_lora', 'write_cloneofsimo_lora']
