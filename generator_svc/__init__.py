"""gRPC adapter serving generators: ListModels, Sample, Synthesize, SynthesizeStream."""
