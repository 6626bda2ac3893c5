"""Task endpoints beyond OpenAI's API: classification (and NER next) on fine-tuned encoders."""
