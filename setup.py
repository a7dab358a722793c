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
        "gpu": ["cupy-cuda12x", "nvidia-nccl-cu12"],
        # transformers on CPU is the reference the tests compare against; torch is pinned
        # to the CPU build (an unpinned torch pulls a CUDA build of several GB).
        "test": ["pytest", "torch==2.13.0", "transformers>=5,<6", "accelerate", "mpich"],
    },
    entry_points={"console_scripts": ["mpinfer=mpinfer.cli:main"]},
)
