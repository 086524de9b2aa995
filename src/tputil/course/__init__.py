"""What only the chapters use: list-based collectives (chapter 1-2), costs, precision bounds, the
mistakes shown failing, traces of collectives, and each chapter's rank functions in a module named
after the chapter (``ch02_collectives``, ``ch08_real_processes``): `launch.run_processes` starts
fresh processes that import the function they run by module and name, so such functions cannot
live in notebook cells.
"""
