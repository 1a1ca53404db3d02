"""Pixels in and out: init images and masks (img2img, inpainting), the hires-fix plan and its
upscalers, tiled VAE passes, and the infotext / PNG metadata written with every image."""
