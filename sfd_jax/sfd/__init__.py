"""SFD / SiD training: states, the DDPM task rules and the pure train steps."""
