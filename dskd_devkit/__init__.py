"""The development kit of axolotl-dskd: a tiny, offline world to test, demonstrate and benchmark
the plugin in. Not part of the plugin (the wheel ships ``axolotl_dskd`` only); importable from the
repository's development install.

- :mod:`~dskd_devkit.tiny_tokenizers`: byte-level BPE and sentencepiece-style tokenizers;
- :mod:`~dskd_devkit.task`: addition in words, tokenized as Axolotl tokenizes it;
- :mod:`~dskd_devkit.training`: tiny Qwen2 / Llama models and a plain torch training loop;
- :mod:`~dskd_devkit.scoring`: exact match and answer NLL on the task;
- :mod:`~dskd_devkit.assets`: the teacher, students and data, built once and cached;
- :mod:`~dskd_devkit.axolotl_runs`: configs and launch commands of real Axolotl runs;
- :mod:`~dskd_devkit.reference`: an independent, unchunked float64 transcription of the loss.
"""
