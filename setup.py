from setuptools import find_packages, setup

setup(
    name="mpinfer",
    version="0.1.0",
    description="MPI batch inference for large language models on HPC clusters",
    packages=find_packages(include=["mpinfer", "mpinfer.*"]),
    python_requires=">=3.11",
    install_requires=[
        "numpy>=1.26",
        "click>=8.1",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "gguf>=0.17",
        "jinja2>=3.1.6",
        "h5py>=3.10",
        "mpi4py>=4.0",
        "tqdm>=4.66",  # the progress bar on a terminal
    ],
    extras_require={
        # mpi4py needs an MPI library: on a cluster the site MPI (mpi4py built against it),
        # elsewhere the MPICH wheel from PyPI.
        "mpi": ["mpich"],
        # GPUs: CuPy runs the kernels, NVRTC (through cuda-bindings) compiles them, NCCL
        # carries TP traffic inside a node. On CUDA 13 use cupy-cuda13x and cuda-bindings 13.
        "gpu": ["cupy-cuda12x", "nvidia-nccl-cu12", "cuda-bindings>=12.9,<13", "nvidia-cuda-nvrtc-cu12"],
        # transformers on CPU is the reference the tests compare against; torch is pinned
        # to the CPU build (an unpinned torch pulls a CUDA build of several GB).
        # NVRTC (no GPU needed): the tests compile every kernel to an sm_90 cubin; nvdisasm
        # (a 5 MB wheel) lets them read the wgmma kernel's machine code.
        "test": ["pytest", "torch==2.13.0", "transformers>=5,<6", "accelerate", "mpich", "cuda-bindings>=12.9,<13",
                 "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-nvdisasm"],
    },
    entry_points={"console_scripts": ["mpinfer=mpinfer.cli:main"]},
)
