"""One module per `fvl` subcommand; each exposes `register(subparsers)`."""
