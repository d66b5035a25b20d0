"""Running a broker: in this process on a thread (``_inproc``), or in a process of its
own that the starter's death takes down (``_process``)."""
