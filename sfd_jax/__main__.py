from sfd_jax.cli import main

main()
