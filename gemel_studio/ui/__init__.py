"""The desktop studio (PySide6 + pyqtgraph). Every Qt import of the project lives in this package.

`app.run_studio` starts it; `main_window.MainWindow` is the shell; `worker.Worker` runs the
core's long functions off the GUI thread.
"""
