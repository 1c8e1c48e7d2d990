"""PEFT LoRA adapters on disk and in host memory.

``peft_config`` (pure) and ``peft_format`` (torch) parse and validate PEFT adapter dirs, ``store``
is the persistent disk tier, ``host_cache`` the bytes-bounded host LRU. Import the submodules
directly: this package imports nothing so the pure parts stay free of torch.
"""
