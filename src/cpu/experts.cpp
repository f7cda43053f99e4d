// Placeholder until the CPU experts op lands.
#include "backend/backend.h"
