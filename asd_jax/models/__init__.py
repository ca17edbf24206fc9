"""Networks: the Wan DiT (and, later, the VAE, umT5 and discriminator heads)."""
