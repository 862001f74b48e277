// nccl.h includes it; the host emulation needs nothing from it.
#pragma once
