"""Stand-in for backend/text_processing/parsing.py: the WebUI's emphasis parser with Forge's emphasis argument."""
from modules import prompt_parser


def parse_prompt_attention(text, emphasis):
    return [[text, 1.0]] if emphasis == "None" else prompt_parser.parse_prompt_attention(text)
