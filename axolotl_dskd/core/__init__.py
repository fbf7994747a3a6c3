"""The framework-free core: the DSKD loss, the projectors, the teacher's tokens and chat
rendering, the teacher cache's format and the teacher's loading.

Torch, transformers and safetensors only: nothing here imports Axolotl or
:mod:`axolotl_dskd.integration`, so the loss and the token alignment serve any trainer.
"""
