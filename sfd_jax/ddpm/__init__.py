"""The class-conditional DDPM task: recipe bases and validation (:mod:`.config`), the noise schedule and samplers
(:mod:`.diffusion`, :mod:`.generate`), sampling from a checkpoint (:mod:`.sampling`), the task rules
(:mod:`.task`), the pure train steps (:mod:`.steps`), network reading (:mod:`.networks`) and the initialisation
rules (:mod:`.init`), the trainer adapters (:mod:`.trainer`), the benchmarks (:mod:`.bench`, :mod:`.torch_bench`
with the PyTorch UNet of :mod:`.torch_unet`) and the digits demo (:mod:`.demo`)."""
