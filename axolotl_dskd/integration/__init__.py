"""The Axolotl integration: the plugin, its YAML keys and their validation, the collator, the
trainer, and the chat data prepared in the teacher's template. Builds on
:mod:`axolotl_dskd.core`; nothing in the core imports it.
"""
