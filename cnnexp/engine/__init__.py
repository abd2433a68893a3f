"""The engine: how a model trains and is evaluated on tensors already on the device.

    optimizers.py   FlatSGD (one flat buffer) and torch.optim behind one interface
    steppers.py     one step (eager or CUDA graph) and one epoch over a permutation
    evaluate.py     loss, accuracy and confusion matrix of a split
    kernels/        the compiled C++ CPU step (a drop-in Stepper)
    autotune.py     times the CPU step candidates and caches the fastest

The machine itself (cores, threads, CPU identity, the cache dir) is cnnexp/cpu.py.
The engine knows nothing of config files, run directories or sweeps.
"""
