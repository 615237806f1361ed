"""Student backbones, projection heads and the robkit checkpoint format."""
