"""Evaluation: a prompt set through FP and quantized models (`prompt_set`), FP vs quantized one prompt at a
time for the app and notebooks (`compare`), and wall-clock timing (`timing`)."""
