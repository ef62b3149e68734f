"""caffe-evo: evolutionary deep intelligence (Shafiee, Wong et al.) on real BVLC Caffe.

pycaffe itself is not a pip dependency: scripts/install_caffe.py builds it and links it into the venv.
"""

from setuptools import find_packages, setup

setup(
    name="caffe-evo",
    version="0.1.0",
    description="Evolve Caffe networks into smaller, faster offspring (evolutionary deep intelligence).",
    packages=find_packages(include=["caffe_evo", "caffe_evo.*", "data_prep", "data_prep.*"]),
    python_requires=">=3.11",
    # pinned versions in requirements.txt; ray only for --executor ray
    install_requires=[
        "numpy<2",
        "protobuf>=4.21,<5",
        "lmdb",
        "tqdm",
        "PyYAML",
        "onnx",
        "onnxruntime",
        "opencv-python-headless",
        "matplotlib",
    ],
    extras_require={"ray": ["ray"]},
    entry_points={"console_scripts": ["caffe-evo=caffe_evo.cli:main"]},
)
