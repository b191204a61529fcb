"""Image files in, pixels out: finding files, decoding them on the CPU (Pillow) or
on the model's device (nvJPEG), and the reader datasets the pipeline feeds on."""
