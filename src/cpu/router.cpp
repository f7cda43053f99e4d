// Placeholder until the CPU router op lands.
#include "backend/backend.h"
