"""device_eval: re-run the task test and the membership-inference attacks on an EXPORTED file,
in the runtime a phone uses (host onnxruntime/LiteRT, or an Android phone over adb), and say
whether the privacy and accuracy measured on the PyTorch model survived deployment."""

from safeexport.openmp import set_wait_policy

set_wait_policy()  # before any module of this package loads torch (safeexport/openmp.py)


def __getattr__(name: str):
    # ``evaluate`` pulls in torch and the runtimes; resolving it lazily keeps --help instant.
    if name == "evaluate":
        from device_eval.run import evaluate

        return evaluate
    raise AttributeError(name)


__all__ = ["evaluate"]
