// Placeholder until the CPU mlp op lands.
#include "backend/backend.h"
