"""LoRA adapters: their files (`files`, no Keras needed), saving and loading them (`store`), merging (`merge`)."""
