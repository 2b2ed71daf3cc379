"""FLA's Kimi Delta Attention LM (``KDAForCausalLM``) as a titan_cp family: the GDN decoder with 'K' layers.

- :mod:`~titan_cp.models.kda.flavors`: shapes (``kda_debug`` for CPU)
- :mod:`~titan_cp.models.kda.model`: the model (titan_cp's GDN LM, ``layer_pattern`` of K (+ A) letters)
- :mod:`~titan_cp.models.kda.parallelize`: CP + TP + AC + compile + FSDP/HSDP (the GDN LM's, with the KDA TP plan)
- :mod:`~titan_cp.models.kda.state_dict_adapter`: FLA ``kda`` safetensors in and out
- :mod:`~titan_cp.models.kda.config_registry`: ModelSpec and TorchTitan config functions
"""
