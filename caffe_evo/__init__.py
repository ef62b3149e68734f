"""caffe-evo: evolutionary deep intelligence (Shafiee, Wong et al. 2016-2018) on real BVLC Caffe.

The package is a Python API (notebook-friendly) with a thin CLI (`caffe-evo`) on top; pycaffe is
imported lazily through :mod:`caffe_evo.caffe_env`.
"""

__version__ = "0.1.0"
