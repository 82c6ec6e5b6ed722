"""Compressing already trained networks: offline trained-model tasks (`tasks`), the main study (`study`) and
the design-choice measurements (`choices`). Outputs go to out/compress/."""
