"""Benchmarks of softmax_ext (``python -m benchmarks``; ``make bench``).

One job per module:

* config.py      what a run measures (ops, directions, implementations, shapes, dtypes, modes)
* device.py      the machine: device choice, results-folder name, description
* peers.py       the implementations compared: softmax_ext, torch, torch.compile, Liger-Kernel
* workloads.py   inputs per op and the timed step per direction (fwd, bwd, fwd+bwd)
* timing.py      CPU and CUDA timers, warm-up, interleaved loop and single-call repetitions
* bandwidth.py   the copy floor and the minimum-bytes model
* memory.py      bytes saved for backward, peak RSS growth, CUDA peak
* runner.py      the sweep that ties them together
* core.py        the core targets, issue 12's speed goals among them (``--suite core``)
* report.py      results.json / core.json / trainer.json and results.md
* plots.py       PNG plots
* trainer_bench.py + d2l_recipe.py   Fashion-MNIST trainers, wall time (``--trainer``)
"""
