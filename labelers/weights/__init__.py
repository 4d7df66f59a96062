"""Package data: the embedded depth teacher's weights (``embedded_depth.safetensors``, fp16)
and their JSON meta (recipe, data, steps, measured accuracy). See ``labelers.embedded``."""
