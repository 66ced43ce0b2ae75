"""The application layer: the command line, the pipeline runner and the run report.

The only code that knows every stage. The kernel (``hashdistill``) imports no stage, not even lazily; the
stages import the kernel; this layer wires them together.
"""
