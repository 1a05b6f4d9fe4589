"""Library chatter is captured and summarised, never printed line by line."""

import logging
import warnings

from edgebuild.quiet import captured_library_output, library_log_lines

PROTOBUF_DUMP = (
    "Inference failed or unsupported type to quantize for tensor 'val_0', type is tensor_type {\n  elem_type: 7\n}\n."
)


def test_library_log_records_are_collected_by_their_first_line_and_not_printed(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logging.basicConfig(format="edgebuild: %(levelname)s: %(message)s", force=True)  # as the CLI sets it up
    try:
        with captured_library_output() as said:
            logging.warning(PROTOBUF_DUMP)  # onnxruntime.quantization logs through the root logger
            logging.getLogger("onnxscript.optimizer").warning("unsupported broadcast")
            logging.getLogger("edgebuild.candidates").warning("our own line")
            warnings.warn("fp16 truncation", UserWarning, stacklevel=1)
            print("Collecting tensor data")
        err = capsys.readouterr().err
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    assert said.messages[:2] == [
        "WARNING: Inference failed or unsupported type to quantize for tensor 'val_0', type is tensor_type",
        "WARNING: unsupported broadcast",
    ]
    assert "UserWarning: fp16 truncation" in said.messages and "Collecting tensor data" in said.messages
    assert err.splitlines() == ["edgebuild: WARNING: our own line"]  # our loggers still speak
    assert said.line("quantize: x").startswith("quantize: x: 4 library message(s) captured (first: WARNING: Inference")


def test_records_go_to_the_innermost_capture_and_the_rest_to_the_command(capsys):
    with library_log_lines() as command:
        logging.warning("export note")
        with captured_library_output() as candidate:
            logging.warning("calibration note")
        logging.warning("validation note")
    assert candidate.messages == ["WARNING: calibration note"]
    assert command.messages == ["WARNING: export note", "WARNING: validation note"]
    logging.warning("after")  # nothing is captured once the command's capture ends
    assert command.messages[-1] == "WARNING: validation note"
