"""Every wire and on-media format, each declared once with construct.

One module per format: `frame` (link frame header and trailer), `messages`
(message bodies carried in frames), `nvram` (NVRAM layout), `disklabel`
(the label and reservation area on each disk). Parsers of untrusted bytes
are named parse_*_untrusted and raise FormatError only.
"""


class FormatError(ValueError):
    """Bytes that do not parse as the format they claim to be.

    The one error type every parse_*_untrusted function raises, whatever the
    input. `where` names the place (file and offset, or link and position)
    when the caller knows it.
    """

    def __init__(self, message: str, where: str = ""):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
