"""The class-conditional DDPM task: recipe bases and validation (:mod:`.config`), the noise schedule and samplers
(:mod:`.diffusion`, :mod:`.generate`), the task rules (:mod:`.task`), the pure train steps (:mod:`.steps`), network
reading (:mod:`.networks`, :mod:`.init`), the trainer adapters (:mod:`.trainer`), the benchmarks
(:mod:`.bench`, :mod:`.torch_bench`) and the digits demo (:mod:`.demo`)."""
