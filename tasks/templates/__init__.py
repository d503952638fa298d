"""Packaged Jinja prompt templates (`PromptConfig.template_name` / `chat_template_name`)."""
