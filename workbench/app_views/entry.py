"""Streamlit entry script inside the package (used by `fvl app` when the repository's app.py is absent)."""
from workbench.app_views.main import main

main()
