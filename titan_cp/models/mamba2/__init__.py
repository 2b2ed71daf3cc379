"""transformers' Mamba-2 LM (``Mamba2ForCausalLM``) as a titan_cp family: the GDN decoder with 'M' layers
and blocks without an MLP.

- :mod:`~titan_cp.models.mamba2.flavors`: shapes (``mamba2_debug`` for CPU, the 130m ... 2.7b shapes)
- :mod:`~titan_cp.models.mamba2.model`: the model (titan_cp's GDN LM, ``layer_pattern`` of M (+ A) letters)
- :mod:`~titan_cp.models.mamba2.parallelize`: CP + TP (head-parallel) + AC + compile + FSDP/HSDP (the GDN LM's)
- :mod:`~titan_cp.models.mamba2.state_dict_adapter`: transformers ``mamba2`` safetensors names in and out
- :mod:`~titan_cp.models.mamba2.hf_config`: ``Mamba2Config`` (config.json) <-> model fields
- :mod:`~titan_cp.models.mamba2.hf_folder`: transformers ``Mamba2ForCausalLM`` folders in and out
- :mod:`~titan_cp.models.mamba2.config_registry`: ModelSpec and TorchTitan config functions
"""
