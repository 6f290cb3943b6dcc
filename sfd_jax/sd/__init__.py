"""The Stable Diffusion task: pipeline loading (:mod:`.pipeline`), scheduler, tokenizer, the one-/k-step generator
(:mod:`.generator`), the SFD step (:mod:`.step`) and its host side (:mod:`.task`, :mod:`.trainer`), the fp16 Adam
emulation (:mod:`.optim`), random pipelines, sampling, benchmarks and the memory check."""
