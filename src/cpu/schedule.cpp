// Placeholder until the CPU schedule op lands.
#include "backend/backend.h"
