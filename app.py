"""Streamlit explorer over a Florence-VL feature store.

    fvl app --store runs/demo/store
    streamlit run app.py -- --store runs/demo/store [--root DIR] [--data DIR] [--model DIR]

The views live in `workbench/app_views/`; this file is only the entry point streamlit runs.
"""
from workbench.app_views.main import main

main()
