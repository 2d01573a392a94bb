"""Build script: pure-Python package (the native CUDA extension is added by the CUDA-backend work)."""
from setuptools import setup

setup()
